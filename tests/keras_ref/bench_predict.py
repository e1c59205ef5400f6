"""Keras side of `scripts/bench.py crbl`: the original CRBL model with random weights, saved as a
legacy .h5 for our converter, and its `predict` throughput. Prints one JSON line.

  TF_USE_LEGACY_KERAS=1 python tests/keras_ref/bench_predict.py OUTDIR --batch-size 32 --size 128 --threads 2
"""
import argparse
import json
import os
import statistics
import sys
import time

if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
    sys.exit("run with TF_USE_LEGACY_KERAS=1")

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--batch-size", type=int, default=32)
p.add_argument("--size", type=int, default=128)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--repeats", type=int, default=5)
args = p.parse_args()

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(args.threads)
tf.config.threading.set_inter_op_parallelism_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import randomize  # noqa: E402
from original_crbl import build_crbl  # noqa: E402

rng = np.random.default_rng(0)
model, _, b1, b2, dense = build_crbl(is_crop=False, input_shape=(args.size, args.size, 3))
randomize(b1.layers, rng)
randomize(b2.layers, rng)
randomize([dense], rng)
os.makedirs(args.out, exist_ok=True)
model.save_weights(os.path.join(args.out, "crbl.h5"))
x = rng.random((args.batch_size, args.size, args.size, 3)).astype(np.float32)
model.predict(x, batch_size=args.batch_size, verbose=0)  # warm-up: graph tracing
times, cpu = [], []
for _ in range(args.repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    model.predict(x, batch_size=args.batch_size, verbose=0)
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
t, c = statistics.median(times), statistics.median(cpu)
# wall clock, and CPU seconds of the whole process (all of TF's threads): the second is less
# disturbed by other programs on a shared machine
print(json.dumps({"img_s": args.batch_size / t, "s_per_batch": t, "cpu_s_per_batch": c,
                  "img_per_cpu_s": args.batch_size / c, "tf": tf.__version__}))
