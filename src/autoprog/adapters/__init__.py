"""Model adapters: make a model run as any sub-network ψ."""
