"""The broker (`fedctl serve`): ROUTER transport, worker registry, consistency policy, parameter store, service."""
