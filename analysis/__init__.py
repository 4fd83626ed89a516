"""MLflow runs -> pandas tables -> matplotlib figures.

- ``analysis.runs``: ``load_runs`` and ``load_history`` read an ablation from any MLflow store.
- ``analysis.tables``: ``variant_table`` (statistics over seeds, differences to the baseline) and
  its Markdown, LaTeX and CSV forms.
- ``analysis.figures``: loss curves, per-axis panels, final-loss bars and the grid heatmap.
- ``analysis.style``: figure sizes, fonts, formats and the fixed colour and line style per variant name.
- ``analysis.report``: ``write_report`` and ``python -m analysis.report NAME``, which write all of them.
"""
