"""Looking at models without merging them: inspect, kinship, verify."""
