"""iyzico: stored-card charges over its REST API, signed with IYZWSv2 (docs/providers/iyzico.md)."""
