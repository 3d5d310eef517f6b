"""Deployment artefacts rendered from config: Kubernetes manifests and Compose services."""
