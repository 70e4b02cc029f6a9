"""Print the README's model table (Markdown) from the registry: our counts next to the papers'."""

from __future__ import annotations

from resnets.cli import model_rows


def fmt(x, digits=2):
    return "" if x is None else f"{x:.{digits}f}"


def main() -> None:
    print(
        "| model | family | input | params (M) | paper params (M) | GMACs | paper GMACs | paper error % | source |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    from resnets import get_entry
    from resnets.registry import FAMILIES

    families = list(FAMILIES)

    def key(r):
        digits = "".join(c if c.isdigit() else " " for c in r["name"]).split()
        return families.index(r["family"]), r["input_size"] == 32, int(digits[0]) if digits else 0, r["name"]

    for r in sorted(model_rows("*"), key=key):
        p = get_entry(r["name"]).paper
        errs = [
            f"{k} {v}"
            for k, v in (("top-1", p.top1_err), ("C10", p.cifar10_err), ("C100", p.cifar100_err))
            if v
        ]
        print(
            f"| `{r['name']}` | {r['family']} | {r['input_size']} | {r['params'] / 1e6:.2f} | {fmt(r['paper_params_m'])} "
            f"| {r['gmacs']:.3f} | {fmt(r['paper_gmacs'], 3)} | {', '.join(errs)} | {r['source']} |"
        )


if __name__ == "__main__":
    main()
