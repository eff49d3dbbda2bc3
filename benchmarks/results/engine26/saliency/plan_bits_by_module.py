"""Mean bits per weight (eq. 6's, INT8 outliers included) by module kind and by layer group, of the 2.0-bit
plans on this engine: the teacher (calibrated knapsack), the searches at 213 passes (search/), the learner's and the
control's returned plans. Reads plan files; the units come from ``find_units`` on the offline model (the plans'
own layout, chunk 256). Run from this folder."""
import glob
import json

import numpy as np

from windquant_gym.models.loading import load_model
from windquant_gym.quant.units import find_units

MODEL, _TOKENIZER = load_model("smollm2-135m", device="cpu")
UNITS = find_units(MODEL, chunk_size=256)
LAYER = np.array([u.layer for u in UNITS])
KIND = np.array([u.module.rsplit(".", 1)[-1].removesuffix("_proj") for u in UNITS])
N = np.array([u.n_weights for u in UNITS], float)
KINDS = list(dict.fromkeys(KIND))


def load(path):
    data = json.load(open(path))
    return np.array(data["action_bits"])[data["actions"]], np.array(data["actions"])


plans = {"teacher": load("search/search_obs_2.0_s0_plans/calibrated-knapsack-2b.json")}
for path in sorted(glob.glob("search/search_obs_2.0_s*_plans/search-nll*.json")):
    plans["search s" + path.split("_s")[-1][0]] = load(path)
for path in sorted(glob.glob("learner/cpu-engine-rot-obs_s*/returned_plan_2.json")):
    plans["ppo s" + path.split("_s")[1][0]] = load(path)
for path in sorted(glob.glob("control/cpu-engine-rot-obs-no-ppo_s*/returned_plan_2.json")):
    plans["ctl s" + path.split("_s")[1][0]] = load(path)
teacher_actions = plans["teacher"][1]
print("| | " + " | ".join(plans) + " |")
print("|---" * (len(plans) + 1) + "|")
print("| units changed from the teacher (of 720) | " + " | ".join(str(int((a != teacher_actions).sum())) for _, a in plans.values()) + " |")


def mean(bits, mask):
    return (bits[mask] * N[mask]).sum() / N[mask].sum()


for name in KINDS:
    print(f"| {name} | " + " | ".join(f"{mean(b, KIND == name):.2f}" for b, _ in plans.values()) + " |")
for low, high in [(0, 1), (1, 3), (3, 8), (8, 15), (15, 22), (22, 28), (28, 30)]:
    mask = (LAYER >= low) & (LAYER < high)
    print(f"| layers {low}-{high - 1} | " + " | ".join(f"{mean(b, mask):.2f}" for b, _ in plans.values()) + " |")
