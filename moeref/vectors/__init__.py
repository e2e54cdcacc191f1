"""Golden reference vectors: generate them, verify them, check an implementation against them.

Host-side I/O (NumPy, safetensors), not math: the formulations themselves stay in pure
array-API code. Modules:

* [`cases`][moeref.vectors.cases]: the case registry (every formulation and preset; how to add one);
* [`io`][moeref.vectors.io]: safetensors case files and the JSON manifest, atomic writes, safe reads;
* [`generate`][moeref.vectors.generate]: ``moeref vectors`` (``generate_vectors(out, only=...)``);
* [`staging`][moeref.vectors.staging]: the staging folder and atomic swap behind ``moeref vectors``;
* [`verify`][moeref.vectors.verify]: ``moeref verify`` (``verify_vectors(folder, backends=...)``);
* [`check`][moeref.vectors.check]: ``moeref check``, a user's function against moeref;
* [`compare`][moeref.vectors.compare]: tolerances by dtype and the tie-aware routing comparison.

**Tensor names** in a case file are ``<group>/<path>``: ``inputs/x``, ``params/router/weight``,
``params/experts/w_in``, ``draws/router/jitter``, ``cotangents/y``, ``outputs/y``,
``outputs/routes/expert_index``, ``grads/x``, ``grads/params/router/weight``,
``aux_grads/params/router/weight``; the path follows the fields of moeref's records, so the
arrays are in moeref's layout (row vectors, ``x @ W``). The manifest lists every tensor with its
dtype and shape.
"""

from ._errors import VectorsError
from .generate import DEFAULT_FOLDER
from .generate import generate as generate_vectors
from .io import MANIFEST, SCHEMA_VERSION
from .verify import verify as verify_vectors

__all__ = ["VectorsError", "DEFAULT_FOLDER", "MANIFEST", "SCHEMA_VERSION", "generate_vectors", "verify_vectors"]
