"""A tiny stand-in for anomalib's WinCLIP (tests of benchmarks/parity/winclip.py only; written for this project).

Same interface as the parts the parity adapter calls (``data.utils.image.read_image``,
``models.image.winclip.lightning_model.WinClip.configure_pre_processor``, ``torch_model.WinClipModel``), computed
with plain loops on the project's tiny CLIP, so CI can run the adapter without anomalib or its open_clip.
"""
