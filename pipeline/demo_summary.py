"""What `make demo` (jobs/demo.py) shows at its end: the inputs over their translations on one sheet,
and the closing summary (the test metrics beside their floors, the search's best trial, where the
outputs and grids are, and how to open them in MLflow's UI)."""

import os


def side_by_side(folder: str, output: str, names: list, path: str) -> str:
    """Inputs (top row) over their translations (bottom row), each tile 128 px (nearest neighbour)."""
    from PIL import Image

    tile = 128
    sheet = Image.new("RGB", (tile * len(names), 2 * tile), "white")
    for i, name in enumerate(names):
        for row, where in enumerate((folder, output)):
            with Image.open(os.path.join(where, name)) as im:
                sheet.paste(im.convert("RGB").resize((tile, tile), Image.NEAREST), (i * tile, row * tile))
    sheet.save(path)
    return path


def score_lines(metrics: dict) -> list[str]:
    """Each test metric that has a floor (baseline/...), beside it and its ceiling."""
    lines = []
    for key in sorted(k for k in metrics if k.startswith("test/")):
        floor = metrics.get(key.replace("test/", "baseline/", 1))
        if floor is None:
            continue
        ceiling = metrics.get(key.replace("test/", "ceiling/", 1))
        top = "" if ceiling is None else f"  ceiling {ceiling:.3f}"
        lines.append(f"  {key:<24} {metrics[key]:.3f}   floor {floor:.3f}{top}")
    return lines


def summary(trained: dict, searched: dict, gate: dict, translated: dict, uri: str, grids: str) -> list[str]:
    """The demo's closing lines: what each phase made, where it is, and how to look at it."""
    best = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in searched["best_params"].items())
    lines = [f"training run {trained['run_name']} ({trained['wall_s']:.0f} s), test split:",
             *score_lines(trained["metrics"]),
             f"search {searched['name']}: best {searched['metric']} = {searched['best_value']:.4f}",
             f"  with {best}",
             f"  results: {searched['results']}",
             f"{'promoted' if gate['promoted'] else 'NOT promoted'} {gate['name']} to @production: "
             f"{gate['key']} >= {gate['bound']:.4f}",
             f"translated: {translated['output']}  (inputs over outputs: {translated['sheet']})",
             f"test grids (input | translation | reconstruction): {grids}",
             "see it all in MLflow:",
             f"  mlflow ui --backend-store-uri {uri} --port 5000",
             "  then open http://127.0.0.1:5000/#/experiments?workflowType=machine_learning (MLflow 3 opens "
             "in its GenAI mode: pick \"Model training\" in the switch at the top)"]
    return lines
