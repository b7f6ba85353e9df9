"""Networks of kvideo: the MoVQ autoencoder (`movq`), its GAN discriminator and LPIPS loss
network (`discriminator`, `lpips`), and the diffusion UNets of the cascade."""
