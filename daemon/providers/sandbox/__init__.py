"""The sandbox provider adapter: payd's client for the sandbox gateway (``payd_sandbox``, in sandbox/)."""
