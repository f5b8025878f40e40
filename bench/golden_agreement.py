"""How close this project's clustering is to the authors' code, on the golden cases.

Reads ``../shared/reference/cribo-golden/clustering_{gauss,vit}.npz`` (outputs of tileb1/CrIBo @
311f569, see its README) and prints, for each case, mode and reference option, the fraction of joint
tokens put in the same cluster, the agreement of the kept-cluster flags, and the mean number of kept
clusters per image. Then one row per rule of ``cribo.pretrain.clustering.ClusteringRules``: the paper mode
with that one rule switched to the reference's, against the authors' uniform-marginal option
(``--update_c false``), which isolates the effect of each remaining difference.

    python bench/golden_agreement.py [--golden DIR]
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import numpy as np
import torch

from cribo.pretrain.clustering import CLUSTERING_RULES, joint_space_clustering, split_views, valid_objects

GOLDEN = REPO.parent / "shared" / "reference" / "cribo-golden"
REFS = {"ref_default": "authors, update_c true", "ref_uniformc": "authors, update_c false"}


def run(g: dict, mode) -> tuple[np.ndarray, np.ndarray]:
    T = torch.from_numpy
    z1, z2, p1, p2 = (T(g[k]) for k in ("z1", "z2", "pos1", "pos2"))
    K = int(g["K"])
    lab = joint_space_clustering(z1, z2, p1, p2, K, float(g["lambda_pos"]), n_outer=int(g["n_outer"]),
                                 n_sinkhorn=int(g["n_sinkhorn"]), eps=1.0 / float(g["sinkhorn_lambda"]),
                                 mode=mode, seeds=T(g["seeds"]))
    a1, a2 = split_views(lab, z1.shape[1])
    return lab.numpy(), valid_objects(a1, a2, K).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--golden", type=Path, default=GOLDEN)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cases = {c: dict(np.load(args.golden / f"clustering_{c}.npz", allow_pickle=False)) for c in ("gauss", "vit")}

    print("| case | mode | against | same cluster | kept flags agree | kept / image (ours vs authors) |")
    print("|---|---|---|---|---|---|")
    for case, g in cases.items():
        for mode in ("reference", "paper"):
            lab, valid = run(g, mode)
            for ref, what in REFS.items():
                same = (lab == g[f"labels_{ref}"]).mean()
                kept = (valid == g[f"valid_{ref}"]).mean()
                print(f"| {case} | {mode} | {what} | {100 * same:.1f} % | {100 * kept:.1f} % | "
                      f"{valid.sum(1).mean():.2f} vs {g[f'valid_{ref}'].sum(1).mean():.2f} |")

    print("\nEach remaining difference alone: paper mode with ONE rule set to the reference's, "
          "against the authors' update_c false (same cluster, gauss / vit)")
    paper = CLUSTERING_RULES["paper"]
    variants = {"paper mode as is": paper}
    for f in dataclasses.fields(paper):
        if f.name != "size_marginals":
            variants[f"+ {f.name}"] = dataclasses.replace(paper, **{f.name: True})
    variants["all but size_marginals (= reference, uniform)"] = dataclasses.replace(
        CLUSTERING_RULES["reference"], size_marginals=False)
    print("| rules | gauss | vit |\n|---|---|---|")
    for name, rules in variants.items():
        figs = [100 * (run(g, rules)[0] == g["labels_ref_uniformc"]).mean() for g in cases.values()]
        print(f"| {name} | {figs[0]:.1f} % | {figs[1]:.1f} % |")


if __name__ == "__main__":
    main()
