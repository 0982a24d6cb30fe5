"""The xl-style toolstack: domain configuration files and what reads them."""
