"""Pure Plotly figure builders, one module per quantity family: data in, figure out.

Each module has `FIGURE_ID` (stable, DOM-friendly: use it as the div id), `TITLE` and
`figure(...) -> plotly.graph_objects.Figure`. Inputs mirror the series API response
(docs/contract.md); none of them touches the database or a request.
"""
