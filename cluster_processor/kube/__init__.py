"""Kubernetes metadata for naming flow endpoints: slim records (``model``), a pure lookup index
(``index``) and the list+watch loop that feeds it from the APIServer (``watcher``)."""
