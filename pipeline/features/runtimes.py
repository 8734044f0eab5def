"""Inference runtimes: which library runs the frozen backbone of stage 1, and at what precision.

A runtime turns the Keras extractor (raw 0-255 images in, pooled features out) into a
`Forward` (`pipeline.features.forward`): float32 images in, float32 numpy features out.

- `tensorflow` traces the Keras model (`compiled_forward`): every device, every backbone.
- `openvino` converts the model once per (backbone, weights, image size, pooling,
  OpenVINO version), caches the converted model beside the feature files under the
  feature files' lock discipline, and runs it on OpenVINO's CPU plugin. On a CPU its
  kernels beat TensorFlow's on the same graph, and it offers bf16 where the CPU has it
  natively (docs/runtimes.md has the measurements and why OpenVINO rather than ONNX Runtime).

`RUNTIME=auto` (`choose`) picks TensorFlow when it sees a GPU, otherwise the first CPU
runtime of `CPU_PREFERENCE` that can run the backbone. Before its first batch, a
runtime other than TensorFlow is verified on the first `PROBE_ROWS` images of that batch,
real images of the run's own data (`VerifiedForward`): at f32 every row's cosine to TensorFlow's features must reach
`MIN_COSINE["f32"]`, so its rows stand in for TensorFlow's (the runtime is not in the
features' key). A failed conversion or verification stops a run that named the runtime,
with the way out (RUNTIME=tensorflow); under `auto` the run warns and goes on with
TensorFlow. bf16 computes other features (its own key) and has no TensorFlow to fall
back on, so there it always stops.

OpenVINO and TensorFlow are imported only when a forward pass is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.config import FeaturesConfig, fingerprint
from pipeline.errors import ConfigError, PipelineError, RuntimeFailure
from pipeline.features import backbones
from pipeline.features.forward import Forward
from pipeline.locks import exclusive
from pipeline.phases import Phases

log = logging.getLogger(__name__)

#: The smallest cosine between a row of a runtime's features and TensorFlow's that passes
#: verification. f32 must agree to float rounding; bf16 keeps about three significant
#: digits, so its check only catches a broken conversion, and its quality is measured on
#: heads instead (docs/runtimes.md).
MIN_COSINE = {"f32": 0.99999, "bf16": 0.95}

#: The rows of the first batch that verification runs through TensorFlow too, one at a
#: time: TensorFlow's CPU allocator keeps the largest batch's activations (and an eager
#: call's, more) for the life of the process, beside the runtime's own (docs/runtimes.md).
PROBE_ROWS = 8

#: RUNTIME=auto without a GPU: the CPU runtimes, fastest first (docs/runtimes.md).
CPU_PREFERENCE = ("openvino", "tensorflow")

#: Where converted models live, under FEATURES_DIR.
CACHE_FOLDER = "runtimes"


class Runtime(Protocol):
    name: str

    def version(self) -> str | None:
        """The installed version, or None when the runtime is not installed."""

    def unsupported(self, config: FeaturesConfig, spec: backbones.BackboneSpec) -> str | None:
        """Why this runtime cannot run `config` ('' or None when it can), decided before any work."""

    def forward(self, model, config: FeaturesConfig, spec: backbones.BackboneSpec, phases: Phases) -> Forward:
        """The backbone `model` (a Keras extractor) on this runtime, ready for its first batch."""


class TensorFlowRuntime:
    """The reference: the Keras model traced once (`compiled_forward`), on any device TensorFlow sees."""

    name = "tensorflow"

    def version(self) -> str | None:
        import tensorflow as tf

        return tf.__version__

    def unsupported(self, config: FeaturesConfig, spec: backbones.BackboneSpec) -> str | None:
        if config.precision != "f32":
            return f"PRECISION={config.precision} runs on openvino only"
        return None

    def forward(self, model, config: FeaturesConfig, spec: backbones.BackboneSpec, phases: Phases) -> Forward:
        from pipeline.features.forward import compiled_forward

        with phases("trace forward pass"):
            return compiled_forward(model, config.image_size, config.batch_size)


class OpenVINORuntime:
    """OpenVINO's CPU plugin, on a model converted once and cached (see the module docstring)."""

    name = "openvino"

    def version(self) -> str | None:
        try:
            import openvino
        except ImportError:
            return None
        return openvino.__version__.split("-")[0]

    def unsupported(self, config: FeaturesConfig, spec: backbones.BackboneSpec) -> str | None:
        if self.version() is None:
            return "openvino is not installed (pip install openvino)"
        if self.name not in spec.runtimes:
            return f"backbone {spec.name} runs on {', '.join(spec.runtimes)} only: {spec.runtime_note}"
        if config.mixed_precision:
            return "MIXED_PRECISION is TensorFlow's float16 on GPUs"
        if config.precision == "bf16" and not cpu_has_native_bf16():
            return "this CPU has no native bf16 (AVX512_BF16 or AMX); emulated bf16 is slower than f32"
        return None

    def forward(self, model, config: FeaturesConfig, spec: backbones.BackboneSpec, phases: Phases) -> Forward:
        from pipeline.features.forward import input_schedule

        converted = converted_model(model, config, spec, self.version(), phases)
        with phases("compile converted model"):
            compiled = _core().compile_model(converted, "CPU", compile_options(config.precision))
            forward = OpenVINOFunction(compiled)
            forward(np.zeros((config.batch_size, config.image_size, config.image_size, 3), np.float32))  # warm-up
        # On a CPU the decoding threads and OpenVINO's share the cores, as with TensorFlow's
        # kernels: bursts (`InputSchedule`); docs/runtimes.md has the measurement that kept it.
        return Forward(forward, input_schedule(), self.name, self.version(), config.precision)


#: RUNTIME name -> runtime object; `auto` is `choose`, not an entry.
RUNTIMES: dict[str, Runtime] = {"tensorflow": TensorFlowRuntime(), "openvino": OpenVINORuntime()}


def get_runtime(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise ConfigError(f"Unknown runtime {name!r}. Expected auto or one of: {', '.join(sorted(RUNTIMES))}.")
    return RUNTIMES[name]


def gpu_visible() -> bool:
    """Whether TensorFlow sees a GPU (RUNTIME=auto then keeps the backbone on TensorFlow)."""
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def cpu_has_native_bf16() -> bool:
    """Whether OpenVINO's CPU plugin runs bf16 natively here (it lists "BF16" only on such CPUs)."""
    return "BF16" in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def cpu_flags() -> list[str]:
    """The CPU plugin's capabilities (BF16, FP32, INT8, ...): what benchmarks record with their numbers."""
    return list(_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def compile_options(precision: str) -> dict[str, Any]:
    """The CPU plugin's settings. The precision is always explicit: on a CPU with native
    bf16 OpenVINO runs bf16 unless told otherwise, which would break the f32 contract.
    THROUGHPUT gives each core a stream of its own (`OpenVINOFunction` splits every batch
    among them): no stream waits at every layer for a core that decoding or another
    process took, as LATENCY's one stream across all cores does (docs/runtimes.md)."""
    return {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "THROUGHPUT"}


_CORE = None


def _core():
    """One OpenVINO Core per process: it holds the CPU plugin, loaded on first use."""
    global _CORE
    if _CORE is None:
        import openvino

        _CORE = openvino.Core()
    return _CORE


@dataclass(frozen=True)
class Choice:
    """The runtime a run asked for resolved: the runtime, and whether `auto` chose it."""

    runtime: Runtime
    auto: bool
    note: str = ""


def choose(config: FeaturesConfig, spec: backbones.BackboneSpec) -> Choice:
    """The runtime for `config` (RUNTIME, PRECISION) and backbone `spec`; a named runtime that
    cannot run it is a one-line error naming the way out, never a silent substitute."""
    if config.runtime != "auto":
        runtime = get_runtime(config.runtime)
        reason = runtime.unsupported(config, spec)
        if reason:
            raise ConfigError(f"RUNTIME={runtime.name} cannot run {spec.name}: {reason}. {_way_out(config)}")
        return Choice(runtime, auto=False)
    if config.precision == "f32" and gpu_visible():
        return Choice(RUNTIMES["tensorflow"], auto=True, note="a GPU is visible")
    reasons = []
    for name in CPU_PREFERENCE:
        runtime = RUNTIMES[name]
        reason = runtime.unsupported(config, spec)
        if not reason:
            return Choice(runtime, auto=True, note="; ".join(reasons))
        reasons.append(f"not {name}: {reason}")
    raise ConfigError(
        f"No runtime can run {spec.name} at PRECISION={config.precision}: {'; '.join(reasons)}. {_way_out(config)}"
    )


def _way_out(config: FeaturesConfig) -> str:
    if config.precision != "f32":
        return "Use PRECISION=f32 (with RUNTIME=tensorflow if need be)."
    return "Use RUNTIME=tensorflow."


def forward_for(model, config: FeaturesConfig, spec: backbones.BackboneSpec, phases: Phases) -> Forward:
    """The backbone `model` on the runtime `config` asks for, verified before its first batch.

    Logs the one line that names the runtime and precision (`runtime: openvino f32`);
    a runtime that fails here follows the rules of the module docstring.
    """
    choice = choose(config, spec)
    tensorflow = RUNTIMES["tensorflow"]

    def reference() -> Forward:
        return tensorflow.forward(model, config, spec, phases)

    if choice.runtime is tensorflow:
        forward = reference()
        log.info("runtime: %s%s", forward.describe(), f" ({choice.note})" if choice.note else "")
        return forward
    try:
        forward = choice.runtime.forward(model, config, spec, phases)
    except PipelineError:  # a lock or the weights: the user's to fix, whatever the runtime
        raise
    except Exception as err:  # a converter's failure has no useful type of its own
        forward = fall_back(choice, config, spec, f"conversion failed ({_first_line(err)})", reference)
        log.info("runtime: %s", forward.describe())
        return forward
    log.info("runtime: %s%s", forward.describe(), f" ({choice.note})" if choice.note else "")
    with phases("trace TensorFlow reference"):  # traced here, so the first batch pays only its own forward pass
        traced = tensorflow.forward(model, dataclasses.replace(config, batch_size=1), spec, Phases())

    def probe(images) -> np.ndarray:  # one image at a time: see PROBE_ROWS
        return np.concatenate([traced(images[i : i + 1]) for i in range(len(images))])

    return VerifiedForward(forward, probe, lambda: traced, choice=choice, config=config, spec=spec)


def fall_back(choice: Choice, config: FeaturesConfig, spec, problem: str, reference) -> Forward:
    """`reference()` (TensorFlow) in place of a failed `choice` under auto at f32, with a
    one-line warning; otherwise the one-line error that names the way out."""
    name = choice.runtime.name
    if not choice.auto or config.precision != "f32":
        raise RuntimeFailure(f"RUNTIME={name} on backbone {spec.name}: {problem}. {_way_out(config)}")
    log.warning("runtime: %s on backbone %s: %s; falling back to TensorFlow.", name, spec.name, problem)
    return reference()


class VerifiedForward:
    """A runtime's `Forward` that checks itself against TensorFlow on its first batch.

    The first call runs the batch through the runtime and its first `PROBE_ROWS` images
    through `probe` (TensorFlow), and compares every probe row (cosine in float64); from
    then on only the runtime runs, or, after a failed check under `auto`, TensorFlow
    (`reference()`). The probe is real images of the run's own data, and the verdict is
    not cached: it costs `PROBE_ROWS` images through TensorFlow per run (docs/runtimes.md).
    """

    def __init__(self, candidate: Forward, probe, reference, *, choice: Choice, config: FeaturesConfig, spec) -> None:
        self.active = candidate
        self.probe = probe
        self.reference = reference
        self.choice = choice
        self.config = config
        self.spec = spec
        self.verified: float | None = None  # the smallest cosine once checked

    @property
    def schedule(self):
        return self.active.schedule

    def describe(self) -> str:
        return self.active.describe()

    def record(self) -> str:
        return self.active.record()

    def __call__(self, images) -> np.ndarray:
        if self.verified is not None:
            return self.active(images)
        expected = self.probe(images[:PROBE_ROWS])
        got = self.active(images)
        self.verified = float(row_cosines(got[:PROBE_ROWS], expected).min()) if len(expected) else 1.0
        threshold = MIN_COSINE[self.config.precision]
        if self.verified >= threshold:
            self.probe = self.reference = None  # TensorFlow's forward pass is not needed again
            log.debug("runtime: %s verified, smallest row cosine to TensorFlow %.7f", self.describe(), self.verified)
            return got
        problem = (
            f"features differ from TensorFlow's on the first batch (smallest row cosine {self.verified:.6f} "
            f"< {threshold})"
        )
        self.active = fall_back(self.choice, self.config, self.spec, problem, self.reference)
        return self.active(images)


def row_cosines(a, b) -> np.ndarray:
    """The cosine of each row of `a` with the same row of `b`, in float64 (two zero rows agree)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = (a * b).sum(axis=1)
    both_zero = (np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0)
    return np.where(both_zero, 1.0, dots / np.where(norms == 0, 1.0, norms))


class OpenVINOFunction:
    """images (N, S, S, 3) float32 -> features (N, D) float32 numpy, on one compiled model.

    The batch is split among the plugin's optimal number of infer requests (one per
    stream), run at once; the plugin runs them without the GIL, and each output aliases
    its request's buffer, hence the copy.
    """

    def __init__(self, compiled) -> None:
        import openvino as ov

        self.compiled = compiled
        self.parts = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self.queue = ov.AsyncInferQueue(compiled, self.parts)
        self.results: list[np.ndarray | None] = [None] * self.parts
        self.queue.set_callback(self._done)

    def _done(self, request, part: int) -> None:
        self.results[part] = np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)

    def __call__(self, images) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(images, dtype=np.float32))
        parts = [p for p in np.array_split(x, self.parts) if len(p)]
        for i, part in enumerate(parts):
            self.queue.start_async({0: part}, userdata=i, share_inputs=True)
        self.queue.wait_all()
        return np.concatenate(self.results[: len(parts)])


# --- the converted model's cache -----------------------------------------------------


def model_identity(config: FeaturesConfig, spec: backbones.BackboneSpec) -> dict[str, Any]:
    """What the converted graph depends on: not the precision (a compile-time setting), not the data."""
    return {
        "backbone": spec.name,
        "weights": backbones.weights_identity(config.weights_arg),
        "image_size": config.image_size,
        "pooling": config.pooling,
    }


def converted_path(config: FeaturesConfig, spec: backbones.BackboneSpec, version: str) -> Path:
    """FEATURES_DIR/runtimes/<backbone>__<size>px__<pooling>__<hash>__openvino-<version>/model.xml."""
    identity = model_identity(config, spec)
    folder = f"{spec.name}__{config.image_size}px__{config.pooling}__{fingerprint(identity)}__openvino-{version}"
    return Path(config.output_dir) / CACHE_FOLDER / folder / "model.xml"


def converted_model(model, config: FeaturesConfig, spec, version: str, phases: Phases):
    """The converted model of `model`: read from the cache, or converted and cached once.

    The cache folder is locked (`pipeline.locks.exclusive`, inside the feature file's
    lock) from the "is it there?" check to the rename, so two runs convert once.
    """
    xml = converted_path(config, spec, version)
    with exclusive(xml.parent, what="converted model"):
        if xml.exists():
            with phases("load converted model"):
                return _core().read_model(str(xml))
        with phases("convert model"):
            started = time.perf_counter()
            converted = convert(model, config.image_size)
            seconds = time.perf_counter() - started
        with phases("save converted model"):
            save_converted(converted, xml, {**model_identity(config, spec), "convert_seconds": round(seconds, 3)})
        log.info("runtime: converted %s to OpenVINO in %.1f s -> %s", spec.name, seconds, xml.parent)
        return converted


def convert(model, image_size: int):
    """A Keras extractor -> an `openvino.Model` with an open batch dimension.

    Through a `tf.function` with an explicit input signature: the graph stage 1 traces,
    without a SavedModel on disk.
    """
    import openvino
    import tensorflow as tf

    spec = tf.TensorSpec((None, image_size, image_size, 3), tf.float32, name="images")

    @tf.function(input_signature=[spec], autograph=False)
    def forward(images):
        return model(images, training=False)

    # The converter prints its arguments to stdout when debug logging is on; stdout is the CLI's.
    with contextlib.redirect_stdout(io.StringIO()) as chatter, _without_telemetry():
        converted = openvino.convert_model(forward)
    log.debug("%s", chatter.getvalue().strip())
    return converted


@contextlib.contextmanager
def _without_telemetry():
    """OpenVINO's converter (ovc) sends usage events to Google Analytics, without asking,
    from forked processes (a fork of a process running TensorFlow's threads), unless the
    user opted out. A feature extractor has no business phoning home: for the conversion,
    ovc's modules get the do-nothing telemetry it ships for when the package is absent."""
    from unittest import mock

    try:
        from openvino.tools.ovc import convert_impl, telemetry_stub, telemetry_utils, utils
    except ImportError:  # another layout of ovc: nothing to replace
        yield
        return
    with contextlib.ExitStack() as stack:
        for module in (convert_impl, telemetry_utils, utils):
            if hasattr(module, "tm"):
                stack.enter_context(mock.patch.object(module, "tm", telemetry_stub))
        yield


def save_converted(converted, xml: Path, identity: dict[str, Any]) -> Path:
    """Writes model.xml, model.bin and model.json (what it was converted from), atomically.

    `compress_to_fp16=False`: the default stores the weights as float16, which costs
    the f32 path its agreement with TensorFlow.
    """
    import openvino

    xml.parent.mkdir(parents=True, exist_ok=True)
    tmp = xml.with_name(f"{xml.stem}.tmp{os.getpid()}.xml")
    openvino.save_model(converted, str(tmp), compress_to_fp16=False)
    xml.with_suffix(".json").write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")
    os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))  # the .bin first: an .xml found is whole
    os.replace(tmp, xml)
    return xml


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]
