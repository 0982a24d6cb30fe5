"""Engines: how a domain's CPU and memory are provided (UML for PV domains)."""
