"""vhost-user: the transport that hands guest memory and notifications to dom0 backends."""
