"""The sparse autoencoder: its model, its training objectives and dead-latent resampling."""
