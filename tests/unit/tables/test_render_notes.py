"""The note of a mean over categories says whose categories they are (issue 18, item 7)."""

from __future__ import annotations

from anorefiner.tables.declare import load_declaration
from anorefiner.tables.render import load_metrics, render_table

from .test_render import TABLES_DIR, flat, write_run


def test_demo_mean_is_not_called_a_subset_of_the_papers_categories(tmp_path):
    root = tmp_path / "m"
    config = {"datasets": {"demo": {"categories": ["tiles", "widget"]}},
              "tables": {"seeds": [0], "datasets": {"MVTec AD": "demo"}}}
    for cat in ("tiles", "widget"):
        write_run(root, "demo", "musc", "coarse", 0, cat, {"coarse": flat(0.5)})
    demo = render_table(load_declaration("demo_table1", TABLES_DIR), config,
                        load_metrics(sorted(root.rglob("*.csv"))), str(root))
    notes = set(demo[demo["row"] == "MuSc"]["note"])
    assert notes == {"mean over the 2 categories of dataset 'demo', not the paper's MVTec AD"}
