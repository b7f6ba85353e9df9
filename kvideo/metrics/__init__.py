"""Evaluation metrics, one module per metric family.

    reconstruction  PSNR and static-background flicker of the autoencoders
    frechet         feature statistics, the Fréchet distance (FID's and FVD's conventions), KID
    inception       the TensorFlow FID's Inception v3 (pytorch-fid's weights file): frame features
    fvd             StyleGAN-V's TorchScript I3D, clips, FVD
    clip_score      CLIPSIM and CLIP-Temp with open_clip and local weights

Every network here is loaded from a local file given by the caller; nothing is downloaded.
"""
