"""The inference layer: everything that turns a trained checkpoint into samples.

- `checkpoints`   find and read checkpoints (weights, typed config)
- `denoiser`      the text-conditioned denoiser every diffusion stage trains (UNet + text encoder)
- `conditioning`  one dataclass per kind of conditioning and the one function that turns
                  (denoiser, x_t, t, condition) into the network call; training and every
                  guidance branch go through it
- `gaps`          the interpolation stage's frame layout (keyframes and the new frames of each gap)
- `autoencoder`   MoVQ helpers: encode clips, decode latents, load the (video) MoVQ
- `loading`       a stage's checkpoint -> a ready-to-sample `Bundle`
- `sampling`      the samplers of the first frame, the keyframes and interpolation, each with an
                  options dataclass filled from the checkpoint's recipe

It imports models, diffusion, data and the registry; never `kvideo.train`.
"""
