"""The names a config may choose among for the model parts.

Kept free of imports: checking a config (``mirl-ds check-config``, the launcher's pre-flight)
reads these tables and must not pay for importing torch and timm (~5 s) to do it.
"""

# objective.name values that cut the encoder into G segments with one decoder each
SEGMENTED_OBJECTIVES = ("mirl", "multi_decoder", "coarse_to_fine", "fine_to_coarse")

# objective.did: which decoder blocks cross-attend to the shallower segments
DID_PLACEMENTS = ("every", "first", "off")

# objective.degradation.kind (Beyond Masking)
DEGRADATION_KINDS = ("none", "zoom_in", "zoom_out", "fisheye", "blur", "decolorize")
