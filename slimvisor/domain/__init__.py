"""The domain: what it is made of (spec), and running one in the foreground (runner, console)."""
