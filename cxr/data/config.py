"""DataConfig: everything that decides which pixels a model sees, in one dataclass."""

from __future__ import annotations

from dataclasses import dataclass, fields

from cxrbase.errors import CxrError

BACKENDS = ("dali", "wds")
DEVICES = ("cpu", "gpu", "auto")


@dataclass
class DataConfig:
    """Loader settings shared by both back ends (`cxr.data.build_loader`)."""

    shards: str = "build/demo/shards"
    """Shards folder with manifest.json (written by `python -m shards pack`), or its URL
    (``s3://bucket/prefix``, ``gs://…``, ``https://…``: read by the wds back end through fsspec,
    shards.remote). Derived shards DIR/res{R}/ are used instead of resizing masters when they exist."""

    backend: str = "dali"
    """dali: NVIDIA DALI pipeline (C++ thread pool; GPU decode with device=gpu).
    wds: torch DataLoader workers decoding with PIL. Same batches, same contract."""

    resolution: int = 1024
    """Side R of the square R×R images handed to the model (≥ 16; 224..1024+ in practice)."""

    batch_size: int = 16
    """Samples per batch per rank in training."""

    eval_batch_size: int | None = None
    """Samples per batch per rank in evaluation (None: batch_size)."""

    num_threads: int = 2
    """DALI CPU threads (they decode PNG, ~95 images/s per core at 1024²; masters resized on
    the fly are decoded + resized by as many source threads), or DataLoader worker processes
    for wds (0 = main process)."""

    source_workers: int = 0
    """DALI back end: processes that read, check and (when resizing) decode samples for the
    pipeline. 0 (default): the external source runs in the training process (on 2 cores the
    parallel source gained ≤ 1.2× in steady state and lost over a whole epoch: bench/RESULTS.md,
    "DALI parallel external source"). N ≥ 1: DALI's parallel
    external source with N spawned workers — same batches, same order, same skips; the
    pipeline (and its workers) is then built per epoch instead of once per run. Worth it only
    when masters are resized on the fly (the source then PIL-decodes every image) on a node
    with cores to spare; pack derived shards (`pack --resize`) first."""

    cache_dir: str | None = None
    """DALI back end with data.shards a URL (s3://, gs://, https://): node-local folder the shards
    are copied into before DALI reads them (shards.cache: the first rank of each node fetches and
    checks each shard's sha256, the others wait; verified shards are reused by later epochs,
    requeues and jobs). None: $CXR_CACHE_DIR (the g5 launch profile sets it to the instance
    NVMe), else $SLURM_TMPDIR/cxr-cache inside a Slurm job, else /tmp/cxr-cache-$USER. A folder
    that outlives the job (the NVMe, not a per-job $SLURM_TMPDIR) lets later jobs reuse it."""

    cache_max_gb: float | None = None
    """Size bound of data.cache_dir in GB (10⁹ bytes): least recently used shards not needed by
    this run are deleted to make room. None: bounded only by the disk's free space."""

    device: str = "cpu"
    """cpu | gpu | auto. gpu decodes with DALI device "mixed" on device_id = local rank (JPEG, lossless
    JPEG and JPEG 2000 shards decode on the GPU, with at most 4 DALI CPU threads; PNG always
    decodes on the CPU). auto (the shipped configs): gpu where CUDA is visible, else cpu,
    decided when the config is loaded (config.yaml records the choice; the start line says it).
    The loader logs the decode device and checks on the first batch that the GPU decoded it."""

    pin_memory: bool | str = "auto"
    """Page-locked host batches (wds back end, DALI CPU outputs) so the `non_blocking`
    host→device copy really is asynchronous. auto: on when a CUDA device is visible."""

    seed: int | None = None
    """Seed of the per-epoch shuffle and of the per-sample augmentation draws. None (default):
    follows train.seed, so one seed varies init, data order and augmentation together; the
    resolved value is what config.yaml records. Set it to keep the data fixed across seeds."""

    strict: bool = False
    """Training: raise CxrError on a corrupt sample instead of skipping and counting it."""

    augment: bool = True
    """Apply the train-time augmentation below (never in evaluation)."""

    hflip_p: float = 0.5
    """Probability of a horizontal flip."""

    rotate_deg: float = 10.0
    """Rotation angle drawn uniformly from ±rotate_deg degrees."""

    brightness: float = 0.1
    """Brightness factor drawn uniformly from 1 ± brightness (multiplies intensity)."""

    contrast: float = 0.1
    """Contrast factor drawn uniformly from 1 ± contrast (around mid-grey 0.5)."""

    translate: float = 0.05
    """Shift in x and y, each drawn uniformly from ±translate × R pixels."""

    scale: float = 0.05
    """Zoom factor drawn uniformly from 1 ± scale."""

    mean: float = 0.5176
    """Normalization mean of [0, 1] intensities: pixel mean of the 130 NIH sample images
    (1024², grey), measured once."""

    std: float = 0.2542
    """Normalization std of [0, 1] intensities: pixel std of the same 130 NIH images."""

    def __post_init__(self) -> None:
        _choice("backend", self.backend, BACKENDS)
        _choice("device", self.device, DEVICES)
        if self.pin_memory not in (True, False, "auto"):
            raise CxrError(f"data.pin_memory={self.pin_memory!r}: unknown — choose auto, true or false")
        _at_least("resolution", self.resolution, 16)
        _at_least("batch_size", self.batch_size, 1)
        if self.eval_batch_size is not None:
            _at_least("eval_batch_size", self.eval_batch_size, 1)
        _at_least("num_threads", self.num_threads, 0)
        _at_least("source_workers", self.source_workers, 0)
        if self.cache_dir is not None and (not isinstance(self.cache_dir, str) or not self.cache_dir.strip()):
            raise CxrError(
                f"data.cache_dir={self.cache_dir!r}: not a folder — give a node-local path or leave it unset"
            )
        if self.cache_max_gb is not None and not (
            isinstance(self.cache_max_gb, (int, float))
            and not isinstance(self.cache_max_gb, bool)
            and self.cache_max_gb > 0
        ):
            raise CxrError(
                f"data.cache_max_gb={self.cache_max_gb!r}: must be a positive number of GB — e.g. 500, or unset"
            )
        if not 0.0 <= self.hflip_p <= 1.0:
            raise CxrError(f"data.hflip_p={self.hflip_p}: must be in [0, 1] — set a probability")
        for name in ("rotate_deg", "brightness", "contrast", "translate", "scale"):
            _at_least(name, getattr(self, name), 0.0)
        for name in ("brightness", "contrast", "scale", "translate"):
            if getattr(self, name) >= 1.0:
                raise CxrError(f"data.{name}={getattr(self, name)}: must be < 1 — use a small jitter like 0.1")
        if self.std <= 0:
            raise CxrError(f"data.std={self.std}: must be > 0 — use the pixel std of your images")

    def resolve_device(self) -> str | None:
        """Turn device=auto into gpu (a CUDA device is visible) or cpu; return the sentence the start
        line prints (None when the device was given)."""
        if self.device != "auto":
            return None
        import torch

        self.device = "gpu" if torch.cuda.is_available() else "cpu"
        return (
            "data.device=auto → gpu (CUDA visible: DALI mixed decode)"
            if self.device == "gpu"
            else "data.device=auto → cpu (no CUDA device visible)"
        )

    @property
    def pinned(self) -> bool:
        """Whether batches are pinned (pin_memory resolved: auto → a CUDA device is visible)."""
        if self.pin_memory == "auto":
            import torch

            return torch.cuda.is_available()
        return bool(self.pin_memory)

    @property
    def resolved_seed(self) -> int:
        """The data seed in use (0 when unset outside a training config, which resolves it)."""
        return 0 if self.seed is None else self.seed

    @property
    def eval_batch(self) -> int:
        """Evaluation batch size per rank (eval_batch_size, else batch_size)."""
        return self.eval_batch_size or self.batch_size

    def normalise_(self, x):
        """In place on float32 pixels 0…255: this config's :func:`normalise_`; returns x."""
        return normalise_(x, self.mean, self.std)

    @classmethod
    def from_run(cls, data: dict | None, **override) -> DataConfig:
        """A run's saved ``data:`` section (config.yaml) → its DataConfig: the keys this version knows,
        the defaults for the rest (a run saved before a field existed trained with its default)."""
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in (data or {}).items() if k in known}, **override})


def normalise_(x, mean: float, std: float):
    """In place on float32 pixels 0…255 (a torch tensor or a numpy array): (x − mean·255) / (std·255),
    the evaluation normalisation (the wds collate step calls it; DALI's crop_mirror_normalize takes the
    same mean·255 and std·255), float32 arithmetic with the scalars rounded to float32; returns x."""
    x -= mean * 255
    x /= std * 255
    return x


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise CxrError(f"data.{name}={value!r}: unknown — choose one of {', '.join(choices)}")


def _at_least(name: str, value: float, low: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < low:
        raise CxrError(f"data.{name}={value!r}: must be a number ≥ {low} — fix the config")
