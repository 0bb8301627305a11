"""The HTML templates of the report pages: the shared head (``BASE``) and the cross-validation
page (Jinja2, rendered with autoescape on).

Kept as a Python string so it ships with the package without package-data configuration.
Everything the page needs is inline: CSS here, figures as ``data:`` URIs; no scripts, no links.
"""

from __future__ import annotations

BASE = """\
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>randkit {{ kind }} report: {{ name }}</title>
<style>
  body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
         max-width: 72rem; padding: 0 1rem; color: #1d1d1f; line-height: 1.45; }
  h1 { margin-bottom: 0.2rem; }
  h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; margin-top: 2.2rem; }
  .date { color: #666; margin-top: 0; }
  .headline { background: #f3f6fb; border-left: 4px solid #3b73b9; padding: 0.8rem 1.2rem; }
  .headline .value { font-size: 1.6rem; font-weight: 600; }
  .headline p { margin: 0.25rem 0; }
  pre { background: #f7f7f7; padding: 0.8rem; overflow-x: auto; font-size: 0.85rem; }
  table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0; }
  th, td { border: 1px solid #ddd; padding: 0.2rem 0.5rem; }
  th { background: #f0f0f0; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; }
  .scroll { overflow-x: auto; }
  img { max-width: 100%; height: auto; display: block; margin: 0.5rem 0; }
  .note { color: #666; font-size: 0.85rem; }
  .verdict { font-size: 1.05rem; font-weight: 600; }
  .probs td { font-size: 1rem; }
  details > summary { cursor: pointer; color: #3b73b9; }
</style>
</head>
<body>
<h1>randkit {{ kind }} report: {{ name }}</h1>
<p class="date">{{ date }}</p>
{% block body %}{% endblock %}
</body>
</html>
"""

TEMPLATE = """\
{% extends "base.html" %}
{% block body %}
<section id="headline">
<h2>Result</h2>
<div class="headline">
<p><span class="value">{{ headline.metric }} {{ headline.mean }}</span>
{% if headline.std %} &plusmn; {{ headline.std }} (std){% endif %}</p>
{% if headline.ci95 %}<p>95% CI {{ headline.ci95 }}
<span class="note">{{ headline.ci95_note }}</span></p>
{% elif headline.ci95_note %}<p>95% CI: none. {{ headline.ci95_note }}</p>{% endif %}
{% if headline.ci95_naive %}<p class="note">naive t interval {{ headline.ci95_naive }}:
{{ headline.naive_note }}</p>{% endif %}
<p>{{ headline.n_trials }} trials{% if headline.design %}, {{ headline.design }}{% endif %}
{% if headline.runner %}, runner {{ headline.runner }}{% endif %}</p>
</div>
{% if per_metric %}
<table class="per-metric">
<thead><tr><th>metric</th><th>mean</th><th>std</th><th>95% CI</th></tr></thead>
<tbody>
{% for row in per_metric %}<tr><td>{{ row.metric }}</td><td class="num">{{ row.mean }}</td>\
<td class="num">{{ row.std }}</td><td class="num">{{ row.ci95 }}</td></tr>
{% endfor %}</tbody>
</table>
{% endif %}
</section>

<section id="trials">
<h2>Trials</h2>
<div class="scroll">
<table class="trials">
<thead><tr>{% for column in trials.columns %}<th>{{ column }}</th>{% endfor %}</tr></thead>
<tbody>
{% for row in trials.rows %}<tr class="trial">{% for cell in row %}\
<td{% if cell.numeric %} class="num"{% endif %}>{{ cell.text }}</td>{% endfor %}</tr>
{% endfor %}</tbody>
</table>
</div>
{% if trials.seed_columns %}
<details class="seeds"><summary>Seeds of each trial's random streams</summary>
<div class="scroll">
<table class="seeds">
<thead><tr>{% for column in trials.seed_columns %}<th>{{ column }}</th>{% endfor %}</tr></thead>
<tbody>
{% for row in trials.seed_rows %}<tr class="seed-row">{% for cell in row %}\
<td{% if cell.numeric %} class="num"{% endif %}>{{ cell.text }}</td>{% endfor %}</tr>
{% endfor %}</tbody>
</table>
</div>
</details>
{% endif %}
</section>

{% if figures.strip %}
<section id="scores">
<h2>Per-trial scores</h2>
<img src="{{ figures.strip }}" alt="per-trial {{ headline.metric }} by {{ strip_by }}">
<p class="note">One point per trial, by {{ strip_by }}; line: mean; bands: 95% CIs.</p>
</section>
{% endif %}

{% if figures.curves %}
<section id="curves">
<h2>Learning curves</h2>
<img src="{{ figures.curves }}" alt="training and validation curves">
<p class="note">Thin lines: one trial each; thick: the mean over trials. Training solid,
validation dashed.</p>
</section>
{% endif %}

{% if figures.variance %}
<section id="variance">
<h2>Sources of spread</h2>
<p>How much the {{ headline.metric }} of one trial moves with each source, as a standard
deviation in {{ variance.unit_name }}:
{% for row in variance.rows %}{{ row.name }} SD {{ row.sd_text }}, {{ row.share_text }}\
{% if not loop.last %}; {% endif %}{% endfor %}.</p>
<img src="{{ figures.variance }}" alt="variance components as standard deviations">
{% if variance.method %}<p class="note">Method: {{ variance.method }}. The SD interval's ends
are the square roots of the variance interval's ends; the share is of the total
variance.</p>{% endif %}
<table class="variance">
<thead><tr><th>source</th><th>SD</th><th>95% CI of the SD</th><th>share of the variance</th>\
<th>variance</th></tr></thead>
<tbody>
{% for row in variance.rows %}<tr><td>{{ row.name }}</td><td class="num">{{ row.sd_text }}</td>\
<td class="num">{{ row.ci_text }}</td><td class="num">{{ row.share_text }}</td>\
<td class="num">{{ row.variance_text }}</td></tr>
{% endfor %}</tbody>
</table>
</section>
{% endif %}

{% if figures.confusion %}
<section id="confusion">
<h2>Confusion matrix</h2>
<img src="{{ figures.confusion }}" alt="confusion matrix summed over trials">
<p class="note">Summed over {{ confusion_trials }} trials; rows: true class, columns: predicted.</p>
</section>
{% endif %}

{% if per_class %}
<section id="per-class">
<h2>Per-class metrics</h2>
<table class="per-class">
<thead><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th>\
<th>support (all trials)</th></tr></thead>
<tbody>
{% for row in per_class %}<tr><td>{{ row.name }}</td><td class="num">{{ row.precision }}</td>\
<td class="num">{{ row.recall }}</td><td class="num">{{ row.f1 }}</td>\
<td class="num">{{ row.support }}</td></tr>
{% endfor %}</tbody>
</table>
<p class="note">Precision, recall and F1: mean over {{ per_class_trials }} trials.</p>
</section>
{% endif %}

{% include "robustness.html" %}


{% include "config.html" %}
{% endblock %}
"""

# Sections the cross-validation and training pages share (``{% include %}``d by both).
SECTIONS = {
    "robustness.html": """\
{% if figures.robustness %}
<section id="robustness">
<h2>Robustness under noise</h2>
<img src="{{ figures.robustness }}" alt="robustness curves">
</section>
{% endif %}
""",
    "config.html": """\
{% if config %}
<section id="config">
<h2>Config</h2>
<details><summary>config.yaml (the resolved experiment)</summary>
<pre>{{ config }}</pre>
</details>
</section>
{% endif %}
""",
}
