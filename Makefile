.PHONY: run test lint setup proto

run:  ## set up, train demo artifacts if none exist, serve on :8000 (HTTP) and :50051 (gRPC)
	scripts/run.sh

test:  ## install what the tests need and run the whole suite
	scripts/test.sh

lint:  ## ruff check and format check (scripts/lint.sh --fix rewrites)
	scripts/lint.sh

setup:
	scripts/setup.sh

proto:  ## regenerate service/proto_gen/ from proto/
	scripts/gen_proto.sh
