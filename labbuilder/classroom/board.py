"""The trainer's board as a web application (Flask, jinja2 templates in ``templates/``).

``make_app`` builds it over a ``BoardSource`` (``labbuilder.api.board.ClassBoard``): the page
``/`` (one row per student, one column per stage; it reloads itself), the same data as JSON at
``/board.json``, and ``POST /students/<name>/reset`` for the page's reset buttons. A form
carries the board's token, so that no other web page the trainer opens can post to it. The
app renders and routes only; serving it is ``labbuilder.adapters.web``'s.
"""

from __future__ import annotations

import hmac
import time
from typing import Any, Protocol

from flask import Flask, Response, abort, jsonify, redirect, render_template, request, url_for

from labbuilder.model.classroom import BoardView

REFRESH_SECONDS = 5


class BoardSource(Protocol):
    def view(self) -> BoardView: ...

    def reset(self, student: str) -> None: ...


def board_dict(view: BoardView) -> dict[str, Any]:
    """The board as JSON: what the page shows, times as epoch seconds."""
    return {
        "class": view.class_name,
        "stages": [{"name": name, "title": title} for name, title in view.stages],
        "reset_stage": view.reset_stage,
        "check_every": view.check_every,
        "round_seconds": None if view.round_seconds is None else round(view.round_seconds, 1),
        "rounds": view.rounds,
        "updated": view.updated,
        "students": [
            {
                "student": row.student,
                "lab": row.lab,
                "nodes": [{"name": node, "state": state} for node, state in row.nodes],
                "stages": {
                    cell.stage: {"status": cell.status, "since": cell.since, "detail": cell.detail}
                    for cell in row.cells
                },
                "checked": row.checked,
                "last_change": row.last_change,
                "busy": row.busy,
                "error": row.error,
            }
            for row in view.rows
        ],
    }


def clock(epoch: float | None) -> str:
    return "—" if epoch is None else time.strftime("%H:%M:%S", time.localtime(epoch))


def make_app(source: BoardSource, token: str) -> Flask:
    app = Flask(__name__, template_folder="templates")
    app.jinja_env.filters["clock"] = clock
    app.jinja_env.autoescape = True

    @app.get("/")
    def page() -> str:
        return render_template(
            "board.html.j2", view=source.view(), token=token, refresh=REFRESH_SECONDS
        )

    @app.get("/board.json")
    def data() -> Response:
        return jsonify(board_dict(source.view()))

    @app.post("/students/<student>/reset")
    def reset(student: str) -> Response:
        given = request.form.get("token", "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            abort(403)
        if student not in {row.student for row in source.view().rows}:
            abort(404)
        source.reset(student)
        return redirect(url_for("page"), code=303)  # type: ignore[return-value]

    return app
