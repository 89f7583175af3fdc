"""Training services: precision-aware gradient handling."""
