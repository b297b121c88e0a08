"""Every metric a dashboard panel or an alert rule queries is one the real server exports."""
from __future__ import annotations

import pytest
from deploy_procs import http_get
from promql_names import (SYNTHETIC, alert_queries, dashboard_queries, exported_names,
                          metric_names)


def test_metric_names_are_extracted_from_promql():
    expr = ('histogram_quantile(0.99, sum by (le, endpoint) (rate(a_bucket{code=~"5..", x="by (y)"}'
            '[$__rate_interval]))) / on (instance) group_left (version) b_info offset 5m'
            ' or sum without (le) (c_total[5m:1m]) and vector(0) > bool 1')
    assert metric_names(expr) == {"a_bucket", "b_info", "c_total"}
    assert metric_names('up{job="repair-proxy"} == 0') == {"up"}


def test_dashboards_and_alerts_query_something():
    dash, alerts = dashboard_queries(), alert_queries()
    assert len(dash) >= 15 and len(alerts) >= 5
    for name, expr in {**dash, **alerts}.items():
        assert metric_names(expr), f"{name}: no metric found in {expr!r}"


@pytest.fixture(scope="module")
def metrics_page(proxy_server) -> str:
    status, body = http_get(proxy_server + "/metrics")
    assert status == 200
    return body.decode()


def test_every_queried_metric_is_exported_by_the_server(metrics_page):
    exported = exported_names(metrics_page)
    assert {"repair_ready", "repair_samples_total", "repair_added_latency_seconds_bucket"} <= exported
    queried = {**{f"dashboard {k}": v for k, v in dashboard_queries().items()},
               **{f"alert {k}": v for k, v in alert_queries().items()}}
    missing = {where: sorted(metric_names(expr) - exported - SYNTHETIC)
               for where, expr in queried.items()}
    missing = {k: v for k, v in missing.items() if v}
    assert not missing, f"queried but not exported by the server: {missing}"


def test_every_repair_metric_the_server_exports_is_on_the_dashboard(metrics_page):
    """The other direction: no metric of CONTRACTS §4 is left unwatched."""
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name for f in text_string_to_metric_families(metrics_page)
                if f.name.startswith("repair_")}
    assert len(families) >= 12
    shown = set().union(*(metric_names(e) for e in dashboard_queries().values()))
    shown_families = {name.removesuffix(suffix) for name in shown
                      for suffix in ("_bucket", "_sum", "_count", "_total", "")
                      if name.removesuffix(suffix) in families}
    assert families - shown_families == set()
