"""When and how images meet the backbone: the input schedule and the traced forward pass."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputSchedule:
    """When images are decoded relative to the forward pass: the one choice that decides
    whether extraction runs at the backbone's speed.

    `overlap` decodes in the background while the backbone runs (tf.data's AUTOTUNE map
    and prefetch): right when the backbone runs on an accelerator and the CPU is free.
    Without one, the backbone's kernels split every layer across all cores and wait for
    the slowest at each layer; a decoding thread that takes a core from one of them
    stalls the rest. `bursts` then decodes each batch on all cores between forward
    passes (a fixed parallel map, no prefetch), which costs decoding's CPU time divided
    by the cores and nothing more. The schedules measured, and the ones left out, are in
    docs/performance.md.
    """

    name: str
    overlap: bool

    def batches(self, records, fn, batch_size: int):
        """`records` mapped by `fn`, unreadable images dropped, batched on this schedule."""
        import tensorflow as tf

        # `fn` holds no Python control flow: tracing it as written skips autograph's
        # conversion of it and its callees, a tenth of a second at a run's first pipeline.
        fn = tf.autograph.experimental.do_not_convert(fn)
        if self.overlap:
            ds = records.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            return ds.ignore_errors().batch(batch_size).prefetch(tf.data.AUTOTUNE)
        options = tf.data.Options()
        options.autotune.enabled = False  # autotuning would grow buffers and decode ahead again
        ds = records.map(fn, num_parallel_calls=_cores(), deterministic=True)
        return ds.ignore_errors().batch(batch_size).with_options(options)


OVERLAP = InputSchedule("overlap", overlap=True)


BURSTS = InputSchedule("bursts", overlap=False)


def input_schedule() -> InputSchedule:
    """`OVERLAP` when TensorFlow places the backbone on a GPU, `BURSTS` on a CPU."""
    import tensorflow as tf

    return OVERLAP if tf.config.list_logical_devices("GPU") else BURSTS


def _cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and Ray set)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class Forward:
    """The backbone on one inference runtime, and the input schedule for the device it runs on.

    Called like a function: images (N, S, S, 3) float32 (numpy or tf.Tensor) -> features
    (N, D) float32 numpy, whatever the runtime, so callers never ask which one they hold.
    `schedule` is what `image_batches` and `view_batches` need to feed it (see
    `InputSchedule`); `runtime`, `version` and `precision` say what computed the features
    (`describe()` is the line every run prints, `record()` what the feature file keeps).
    """

    fn: Any
    schedule: InputSchedule
    runtime: str = "tensorflow"
    version: str = ""
    precision: str = "f32"

    def __call__(self, images):
        return self.fn(images)

    def describe(self) -> str:
        return f"{self.runtime} {self.precision}"

    def record(self) -> str:
        """'openvino 2026.4.1 f32': the runtime, its version and the precision, as feature files list them."""
        return f"{self.runtime} {self.version} {self.precision}"


def compiled_forward(model, image_size: int, batch_size: int) -> Forward:
    """The backbone as one traced TensorFlow graph for every batch size, warmed up at `batch_size`.

    The batch dimension is left open so a split's last, smaller batch reuses the
    graph instead of tracing another. The warm-up call pays for the trace and for
    the kernels oneDNN builds for each input shape (a tenth of a second and more
    for MobileNetV2 on a CPU) before the first batch, as the benchmark's bare forward
    pass does before its timing starts.
    """
    import tensorflow as tf

    # No Python control flow: traced as written, without autograph (0.02-0.03 s).
    @tf.function(input_signature=[tf.TensorSpec((None, image_size, image_size, 3), tf.float32)], autograph=False)
    def forward(images):
        return model(images, training=False)

    forward(tf.zeros((batch_size, image_size, image_size, 3))).numpy()
    schedule = input_schedule()
    log.info("input schedule: %s", schedule.name)
    return Forward(lambda images: forward(images).numpy(), schedule, "tensorflow", tf.__version__, "f32")
