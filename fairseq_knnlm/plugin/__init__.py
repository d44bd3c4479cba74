"""plugin: the fairseq-facing wiring in one place (the task and its options, the sequence
scorer, the eval-lm patch and --help, the key-capture hooks) and the run's orchestration
(runtime: dump, kNN scorer, cache, neighbour saver, summary). The only code that imports
fairseq; it may import every stage below it, and nothing imports it but cli/ and the
package's own registration."""
