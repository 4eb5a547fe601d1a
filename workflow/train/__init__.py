"""Training: the shared trainer kit (sampling, scoring, resume, KL control) and the SFT, reward and policy stages."""
