"""How close CUDA's bfloat16 embeddings must come to the CPU's float32 ones.

bfloat16 keeps 8 bits of mantissa. The same demo crops through the served model (MobileNetV2, 128 px) under CPU
bfloat16 autocast gave a lowest cosine of 0.981 to float32 and moved pairwise similarities by at most 0.026;
these bounds leave room for the GPU's kernels without letting a wrong device path (unnormalized input,
another model) through.
"""

MIN_COSINE = 0.97
MAX_SIMILARITY_SHIFT = 0.05
