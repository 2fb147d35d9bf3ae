"""synthdistill-jax: SynthDistill (Otroshi Shahreza et al., IJCB 2023) in JAX.

Trains lightweight face-recognition students by distilling a frozen ArcFace
teacher on faces a frozen StyleGAN2 generates on the fly; see
https://arxiv.org/abs/2308.14852.
"""

__version__ = "0.1.0"
