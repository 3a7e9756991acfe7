"""sandkeep.engine: the instance lifecycle and unexpected-stop recovery (SPEC §2-§9, §12).

* :mod:`~sandkeep.engine.runtime` - ``Engine``: worker loop over due alarms, wake-ups, the detector.
* :mod:`~sandkeep.engine.instances` - ``InstanceService`` (what the API and the web UI call).
* :mod:`~sandkeep.engine.reconcile` - the dispatcher by status (pure decisions).
* :mod:`~sandkeep.engine.lifecycle` - starting/restarting, running, stopped, provisioned, destroying.
* :mod:`~sandkeep.engine.recovery` - unexpected-stop recovery end to end (SPEC §7).
* :mod:`~sandkeep.engine.actions` - what reconcile observed and the typed actions decisions return.
* :mod:`~sandkeep.engine.executor` - performs actions under the lease (fenced writes, 7.5 safe delete).
* :mod:`~sandkeep.engine.detector` - fast stop detection (local watch stream or list-per-app poll).
* :mod:`~sandkeep.engine.events` - one ``emit``: event row, JSON log line, Prometheus metrics.
* :mod:`~sandkeep.engine.naming`, :mod:`~sandkeep.engine.policy`, :mod:`~sandkeep.engine.health`.
"""
