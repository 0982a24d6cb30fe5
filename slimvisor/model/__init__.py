"""The engine-neutral domain model: what a domain is made of, as plain validated data.

Parsed and checked for form only; what the host must provide (files, a kernel the engine can run)
is checked by the domain layer (slimvisor.domain.check) just before anything starts.
"""
