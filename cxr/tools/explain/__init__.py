"""`python -m cxr.tools.explain` — CAM, Grad-CAM and saliency overlays, and localisation against boxes.

    python -m cxr.tools.explain --run RUN --shards DIR --split test --keys K1,K2 \\
        --labels Cardiomegaly,Effusion --method gradcam --out DIR          # overlays + index.html
    python -m cxr.tools.explain --run RUN --shards DIR --bbox BBox_List_2017.csv.gz --out DIR   # localisation
    python -m cxr.tools.explain --runs R224 R512 R1024 --shards DIR --bbox FILE --out DIR      # across runs
    accelerate launch [--multi_gpu --num_processes N] -m cxr.tools.explain ...   # each rank a disjoint share

Methods (every map is [B, L, h, w], clipped at 0, for labels L of the batch):

- ``cam`` — M_c = Σ_k w_{c,k} f_k on ``model.features`` with ``model.classifier_weight``
  (pooled-linear heads only: densenet121, resnet50, cnn, vit; refused for CBAM and BEiT).
- ``gradcam`` — ReLU(Σ_k α_k f_k), α_k = mean over space of ∂y_c/∂f_k, on the output
  f of one layer: ``--layer NAME``, or by default the deepest of the model's candidate
  layers (``model.cam_layer_candidates``: the cnn's blocks before and after their pools,
  DenseNet's dense blocks and transitions, ResNet's layer1–4, then ``model.cam_layer``)
  whose map has ≥ ``--min-map`` (16) cells a side — the final map when it is that fine
  (the cnn at 1024 px: 32×32), an earlier one at low resolution (the cnn at 128 px:
  the 16×16 ReLU of its 4th block, as its final 4×4 map puts every peak on one of 16
  cell centres). The layer and its map size are printed and kept in runs.json and
  localisation.md. Transformers (vit, beit): Grad-CAM on the last
  block's patch tokens on their grid (the ``TokenGrid`` cam layer: after ViT's final
  norm, before BEiT's fc_norm). Attention rollout is not offered: it is class-agnostic
  (one map for all 14 labels) and timm's fused attention does not expose the weights.
- ``saliency`` — max(0, Σ_{i∈S} ∂y_i/∂I): the gradient of the summed logits of a label
  set S with respect to the model's (normalised) input image I; per-label maps use
  S = {c}. y is always the logit (pre-sigmoid), as in Grad-CAM.

Library: Grad-CAM and saliency are captum's ``LayerGradCam`` and ``Saliency``
(captum 0.9, pure Python on torch; it owns the hooks and the extra forward
arguments, so metadata models work unchanged). pytorch-grad-cam (``grad-cam``) was
not used: it min–max normalises and resizes every map through OpenCV (a new heavy
dependency), which hides the raw values that the CAM = Grad-CAM identity and the
energy-fraction score need. CAM is one einsum here (captum has no CAM).

Overlays are drawn on the shard's master image (the full-resolution original, not
the model's input): the map is upsampled bilinearly to the master's size, coloured
(jet) and blended where it is high; a caption band says key, label, method,
predicted probability and ground truth; ground-truth boxes are drawn when --bbox is
given. ``index.html`` shows them together (one row per image).

Localisation (--bbox): every (image, label) of the split that has a box of that
label in the file (all boxes of that label on the image form one region). Boxes are
in the source image's pixels (the NIH file: 1024² originals; `shards synth`'s
boxes.csv: the phantom's resolution) and are scaled to the model's input size R,
where the map (upsampled to R×R) is scored:

- hit — the map's maximum lies inside the region (pointing game; an all-zero map is a miss);
- empty — the map is zero everywhere (no positive evidence for the label at that layer):
  scored as a miss, and counted in its own column (count and rate) so that "no evidence"
  is not read as "looked elsewhere";
- IoU — of {map ≥ t · max} (t = --threshold, default 0.5) with the region;
- energy — the fraction of the map's sum inside the region;
- chance — region area / image area (a uniformly random peak's hit rate).

Means per label and over all pairs, with percentile-bootstrap CIs over images
(``cxr.evaluation.stats.bootstrap_counts``), go to ``localisation.csv`` and ``localisation.md``;
the per-pair scores to ``localisation_pairs.csv``; ``runs.json`` lists each run's model
and resolution with the counts. The report says how many of the split's images were scored. Data, models and ranks are handled with cxr.evaluation.inference's
pieces (run dirs, weights-only checkpoints, the loader config, accelerate's
``gather_object``); each rank explains a disjoint, contiguous share of the chosen
images with the evaluator's own loader.

The package, by job: ``maps`` (the three methods, the default layer, upsampling), ``boxes``
(box parsing, localisation scores and their report), ``overlays`` (overlay images, index.html),
``masters`` (the shard's master images), ``run`` (one run over this rank's images) and ``cli``
(the parser, the plan and ``main``; ``python -m cxr.tools.explain`` runs it).
"""

from cxr.tools.explain.boxes import (
    BOX_SPELLINGS,
    NIH_BOX_FRAME,
    SCORES,
    box_mask,
    format_runs_table,
    localisation,
    localisation_markdown,
    read_boxes,
    scale_boxes,
    summarise,
    write_localisation,
)
from cxr.tools.explain.cli import (
    build_parser,
    main,
    plan_job,
)
from cxr.tools.explain.maps import (
    EMPTY_MEANING,
    METHOD_NAMES,
    METHODS,
    MIN_MAP,
    SALIENCY_MICRO_BATCH,
    cam_maps,
    choose_layer,
    gradcam_maps,
    heat_maps,
    layer_map_sizes,
    saliency_map,
    upsample,
)
from cxr.tools.explain.masters import (
    Masters,
)
from cxr.tools.explain.overlays import (
    overlay,
    overlay_levels,
    write_index,
)
from cxr.tools.explain.run import (
    Job,
    explain_run,
    rank_share,
    select_keys,
    subset_loader,
)

__all__ = [
    "METHODS",
    "SALIENCY_MICRO_BATCH",
    "METHOD_NAMES",
    "BOX_SPELLINGS",
    "NIH_BOX_FRAME",
    "SCORES",
    "cam_maps",
    "gradcam_maps",
    "saliency_map",
    "heat_maps",
    "EMPTY_MEANING",
    "MIN_MAP",
    "layer_map_sizes",
    "choose_layer",
    "upsample",
    "read_boxes",
    "scale_boxes",
    "box_mask",
    "localisation",
    "summarise",
    "overlay_levels",
    "overlay",
    "write_index",
    "Masters",
    "select_keys",
    "rank_share",
    "subset_loader",
    "Job",
    "explain_run",
    "localisation_markdown",
    "format_runs_table",
    "write_localisation",
    "build_parser",
    "plan_job",
    "main",
]
