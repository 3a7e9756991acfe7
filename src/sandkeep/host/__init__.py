"""The local machine host: a Fly Machines API subset running real processes on directory volumes.

Run it with ``sandkeep host`` (see :mod:`sandkeep.cli.host_cmd`). Everything under ``/v1`` and ``/_local``
needs ``Authorization: Bearer <token>``; ``GET /healthz`` does not.

Fly API (``/v1``): apps (list, create, get, delete); machines (create, get, list with ``metadata.KEY=VALUE``,
``region``, ``include_deleted``; update; start; stop; restart; destroy with ``force``/``kill``; wait with
``state`` and ``timeout`` <= 60 s, 408 on timeout; events, newest first; metadata get/set/delete); volumes
(create, incl. ``source_volume_id`` fork and ``snapshot_id`` restore; get; list; delete; snapshots list/create).

Local extras (``/_local``): ``POST apps/{app}/machines/{id}/crash`` (SIGKILL, exit 137);
``GET regions``; ``POST regions/{region}/outage {"down": bool}``; ``POST regions/{region}/capacity
{"available": bool}``; ``GET|POST|DELETE faults`` (rules: see :mod:`sandkeep.host.faults`);
``GET watch?since=&timeout=`` (long-poll of every machine state change); ``POST snapshots/run`` (run the
snapshot scheduler's pass now).

The proxy (``--proxy-listen``) forwards any request carrying ``fly-force-instance-id: <machine id>`` to that
machine's gateway: 400 without the header, 404 for an unknown machine, 503 when it is not started.

Images (:mod:`sandkeep.host.images`): ``sandkeep/gateway`` plus test images ``sandkeep/crashy`` (fails to
boot -> ``failed``), ``sandkeep/oneshot`` (exits with ``$EXIT_CODE`` -> ``stopped`` + exit event) and
``sandkeep/stubborn`` (ignores SIGTERM). The machine restart policy is not applied: an exited machine stays
``stopped``.
"""
