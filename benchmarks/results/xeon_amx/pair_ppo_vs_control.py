"""PPO vs its PPO-off control per seed on this Xeon, each against the teacher; from the stored window NLLs."""
import json, re, sys
from windquant_gym.eval.bootstrap import paired_bootstrap, describe_change

def rows(path):
    return json.load(open(path))["episodes"]

def seed_of(row, kind):
    m = re.search(kind + r"(?:_fp32)?_s(\d)", row.get("plan_file", ""))
    return int(m.group(1)) if m else None

def pick(rs, kind):
    return {seed_of(r, kind): r for r in rs if seed_of(r, kind) is not None}

def change(a, b):
    c = paired_bootstrap(a["heldout_window_nll"], b["heldout_window_nll"])
    return describe_change(c.change, c.low, c.high)

X = ""  # run in benchmarks/results/xeon_amx/
files = {"2": (X + "replay_2.json", "replay_noppo_2.json"), "2.5": ("replay_2.5.json",), "3": ("replay_3.json",)}
for t, paths in files.items():
    try:
        rs = [r for p in paths for r in rows(p)]
    except FileNotFoundError as e:
        print(t, "missing", e); continue
    teacher = next(r for r in rs if r["allocator"] == "calibrated-knapsack")
    unq = [r for r in rs if r["allocator"] == "unquantized"]
    ppo = pick(rs, "cpu")  # cpu_s0 / cpu_fp32_s0 / cpu_s1 ...
    ppo = {k: v for k, v in ppo.items() if "bf16" not in v["plan_file"]}
    ctl = pick(rs, "noppo")
    print(f"target {t}: teacher {teacher['heldout_ppl']:.2f}")
    for s in sorted(ctl):
        p, c = ppo[s], ctl[s]
        print(f"  seed {s}: PPO {p['heldout_ppl']:.2f} ({change(teacher, p)} vs teacher), control {c['heldout_ppl']:.2f} "
              f"({change(teacher, c)} vs teacher); PPO vs control {change(c, p)}")
    import statistics
    print(f"  median PPO {statistics.median(v['heldout_ppl'] for v in ppo.values()):.2f}, control {statistics.median(v['heldout_ppl'] for v in ctl.values()):.2f}")
