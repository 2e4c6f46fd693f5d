"""Cost of the weights check on the default model: cold (no digest cache) vs warm (cached)."""

import os
import tempfile
import time

from amygdala.models import resolve_model
from amygdala.models.weights import weight_record

path = resolve_model("default")
with tempfile.TemporaryDirectory() as home:
    os.environ["AMYGDALA_HOME"] = home  # an empty digest cache; the model stays where it is
    t = time.perf_counter()
    rec = weight_record(path)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    weight_record(path)
    warm = time.perf_counter() - t
size = sum(f["size"] for f in rec["files"]) + (rec.get("source") or {}).get("size", 0)
print(f"default model ({size / 1e6:.0f} MB of safetensors hashed): cold {cold:.2f} s, warm {warm * 1000:.1f} ms, "
      f"ratio {cold / max(warm, 1e-9):.0f}x")
