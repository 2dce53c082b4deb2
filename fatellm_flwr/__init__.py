"""fatellm-flwr: FATE-LLM's federated LLM algorithms as a Flower app."""

__version__ = "0.1.0"
