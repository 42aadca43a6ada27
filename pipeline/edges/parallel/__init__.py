"""Ray, and only here: where profiling tasks run (in process, a private local instance, or a
cluster), the connection to a cluster with its checks and token authentication, and the
backends that run tasks and report where each ran."""
