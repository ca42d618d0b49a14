import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
# The test models are tiny: one thread is as fast, and it keeps timings sane when the machine is shared.
torch.set_num_threads(1)
