"""Mean bits per weight (eq. 6's, INT8 outliers included) by module kind and by layer group, of the 2.0-bit
plans on this engine: the teacher (calibrated knapsack), the search at 213 passes (seeds found in search/),
the learner's and the control's returned plans. Reads plan files only; the unit layout is SmolLM2-135M's
(``find_units``: layer by layer, q k v o gate up down, 256-column chunks). Run from this folder."""
import glob
import json

import numpy as np

MODULES = [("q", 576, 576), ("k", 192, 576), ("v", 192, 576), ("o", 576, 576), ("gate", 1536, 576),
           ("up", 1536, 576), ("down", 576, 1536)]
UNITS = [(layer, name, rows * min(256, cols - start)) for layer in range(30) for name, rows, cols in MODULES
         for start in range(0, cols, 256)]
LAYER = np.array([u[0] for u in UNITS])
KIND = np.array([u[1] for u in UNITS])
N = np.array([u[2] for u in UNITS], float)


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


for name, _, _ in MODULES:
    print(f"| {name} | " + " | ".join(f"{mean(b, KIND == name):.2f}" for b, _ in plans.values()) + " |")
for low, high in [(0, 1), (1, 3), (3, 8), (8, 15), (15, 22), (22, 28), (28, 30)]:
    mask = (LAYER >= low) & (LAYER < high)
    print(f"| layers {low}-{high - 1} | " + " | ".join(f"{mean(b, mask):.2f}" for b, _ in plans.values()) + " |")
