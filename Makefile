# The two commands the README promises. Both install what they need first.
.PHONY: demo test setup bench broker-start broker-stop clean

demo:
	scripts/demo.sh

test:
	scripts/test.sh

setup:
	scripts/setup.sh

bench: setup
	.venv/bin/python bench/e2e.py

broker-start: setup
	deploy/local-kafka/kafka.sh start

broker-stop:
	deploy/local-kafka/kafka.sh stop

clean:
	deploy/local-kafka/kafka.sh stop || true
	rm -rf runs demo-out .pytest_cache .mypy_cache .ruff_cache
