"""Stage 1, problems to verified traces.

The doors (each module keeps heavy imports inside its functions, so importing one is cheap):

* ``runner``         -- ``distill generate``: ``GenerateConfig``, ``run_generate`` (resume, settings check, streaming)
* ``client``         -- the OpenAI-compatible client: ``ChatClient`` (endpoints, retries, SSE), ``chat_sync``
* ``teacher_server`` -- ``distill serve-teacher``: the offline stand-in teacher (``TeacherConfig``, ``spawn_teacher``)
* ``problems``       -- ``distill problems``: synthetic problems with exact answers (``synth``, ``solve``)
* ``reject``         -- ``distill reject``: ``RejectConfig``, ``run_reject`` (math-verify, killable workers, resume)
"""
