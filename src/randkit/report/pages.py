"""The HTML templates of the training-run page and the comparison page (Jinja2, autoescape
on), on the shared head of ``template.BASE``."""

from __future__ import annotations

TRAIN = """\
{% extends "base.html" %}
{% block body %}
<section id="headline">
<h2>Result</h2>
<div class="headline">
<p><span class="value">test {{ headline.metric }} {{ headline.value }}</span></p>
{% if headline.ci %}<p>95% CI {{ headline.ci }} <span class="note">{{ headline.note }}</span></p>
{% elif headline.note %}<p class="note">{{ headline.note }}</p>{% endif %}
</div>
<table class="scores">
<thead><tr><th>test metric</th><th>value</th></tr></thead>
<tbody>
{% for row in scores %}<tr><td>{{ row.metric }}</td><td class="num">{{ row.value }}</td></tr>
{% endfor %}</tbody>
</table>
<table class="facts">
<tbody>
{% for row in facts %}<tr><th>{{ row.name }}</th><td class="num">{{ row.value }}</td></tr>
{% endfor %}</tbody>
</table>
</section>

{% if figures.curves %}
<section id="curves">
<h2>Learning curves</h2>
<img src="{{ figures.curves }}" alt="training and validation curves">
<p class="note">Training solid, validation dashed, per epoch.</p>
</section>
{% endif %}

{% if figures.confusion %}
<section id="confusion">
<h2>Confusion matrix</h2>
<img src="{{ figures.confusion }}" alt="confusion matrix on the test part">
</section>
{% endif %}

{% include "robustness.html" %}

{% include "config.html" %}

{% if seeds %}
<section id="seeds">
<h2>Seeds</h2>
<details><summary>Seed of each random stream</summary>
<table class="seeds">
<thead><tr><th>source</th><th>seed</th></tr></thead>
<tbody>
{% for row in seeds %}<tr><td>{{ row.source }}</td><td class="num">{{ row.seed }}</td></tr>
{% endfor %}</tbody>
</table>
</details>
</section>
{% endif %}
{% endblock %}
"""

COMPARE = """\
{% extends "base.html" %}
{% block body %}
<section id="headline">
<h2>Result</h2>
<div class="headline">
<p><span class="value">{{ metric }}: A {{ means[0] }} vs B {{ means[1] }}</span></p>
<p>A = {{ names[0] }}, B = {{ names[1] }}; {{ result.n_trials }} paired trials of the same
plan. Differences are signed so that a positive one favours A.</p>
<p class="verdict">{{ result.verdict }}</p>
<p class="verdict">{{ bayes.verdict }}</p>
</div>
</section>

<section id="frequentist">
<h2>Frequentist tests</h2>
<table class="frequentist">
<thead><tr><th>test</th><th>statistic</th><th>p-value</th><th>95% CI of the difference</th>\
</tr></thead>
<tbody>
{% for row in frequentist %}<tr><td>{{ row.test }}</td><td>{{ row.statistic }}</td>\
<td class="num">{{ row.p }}</td><td class="num">{{ row.ci }}</td></tr>
{% endfor %}</tbody>
</table>
<p class="note">The corrected t-test (Nadeau &amp; Bengio 2003) widens the variance for the
overlap of cross-validation training sets; Dietterich's 5x2cv test shows for 5x2 plans.</p>
</section>

<section id="bayesian">
<h2>Bayesian correlated t-test</h2>
<table class="bayesian probs">
<thead><tr><th>P(A better)</th><th>P(equivalent)</th><th>P(B better)</th><th>ROPE</th></tr></thead>
<tbody><tr><td class="num">{{ bayes.a }}</td><td class="num">{{ bayes.equivalent }}</td>\
<td class="num">{{ bayes.b }}</td><td class="num">&plusmn;{{ bayes.rope }}</td></tr></tbody>
</table>
<p class="note">ROPE: region of practical equivalence, {{ bayes.rope_chosen }}. Posterior of
the mean difference: {{ bayes.posterior }} (Corani &amp; Benavoli 2015).</p>
{% if figures.posterior %}
<img src="{{ figures.posterior }}" alt="posterior of the mean difference">
{% endif %}
</section>

<section id="differences">
<h2>Paired differences</h2>
<img src="{{ figures.differences }}" alt="paired differences per trial">
<div class="scroll">
<table class="differences">
<thead><tr><th>trial</th><th>fold</th><th>repeat</th><th>A</th><th>B</th>\
<th>difference</th></tr></thead>
<tbody>
{% for row in table %}<tr class="pair"><td>{{ row.id }}</td><td class="num">{{ row.fold }}</td>\
<td class="num">{{ row.repeat }}</td><td class="num">{{ row.a }}</td>\
<td class="num">{{ row.b }}</td><td class="num">{{ row.difference }}</td></tr>
{% endfor %}</tbody>
</table>
</div>
</section>
{% endblock %}
"""
