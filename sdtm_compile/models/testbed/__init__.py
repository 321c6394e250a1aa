"""The trained testbed: a small SD3 transformer with learned weights, so fidelity numbers mean something.

Token merging pays off because trained models produce redundant tokens (smooth regions, repeated texture); a
model with random weights has none. No pretrained diffusion weights can be downloaded here and no package ships
small ones, so we train one on images that install with scikit-image / scikit-learn and ship its weights:

* :mod:`.data`: the images (source and licence of each), crops and their labels;
* :mod:`.model`: the model (``SD3Transformer2DModel`` in pixel space + a label "text encoder"), loading the
  shipped weights with their checksum;
* :mod:`.train`: the rectified-flow training (``sdtm-compile train-testbed``);
* :mod:`.quality`: image measures (held-out loss merged vs unmerged, PSNR, SSIM) and the sample picture.

The model preset ``testbed-1024`` (:data:`sdtm_compile.models.TESTBED`) loads it for the bench and the tests.
"""
