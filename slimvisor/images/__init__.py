"""Guest images: small busybox guests, Debian roots, kernels for other front-ends; all cached."""
