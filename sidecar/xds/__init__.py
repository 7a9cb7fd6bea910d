"""The sidecar's side of xDS: `client` (the ADS stream) and `interpret` (resources -> config)."""
