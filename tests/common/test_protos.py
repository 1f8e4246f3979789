"""The generated stubs import as `protos.*` and carry the contract's names."""

from __future__ import annotations

from protos import encoder_pb2, encoder_pb2_grpc, generator_pb2, generator_pb2_grpc


def test_stubs_import_and_services_exist() -> None:
    assert encoder_pb2.DESCRIPTOR.package == "mmserve.encoder.v1"
    assert generator_pb2.DESCRIPTOR.package == "mmserve.generator.v1"
    assert hasattr(encoder_pb2_grpc, "EncoderStub") and hasattr(encoder_pb2_grpc, "EncoderServicer")
    assert hasattr(generator_pb2_grpc, "GeneratorStub") and hasattr(generator_pb2_grpc, "GeneratorServicer")
    encoder_methods = {m.name for m in encoder_pb2.DESCRIPTOR.services_by_name["Encoder"].methods}
    generator_methods = {m.name for m in generator_pb2.DESCRIPTOR.services_by_name["Generator"].methods}
    assert {"Encode", "GetModelInfo"} <= encoder_methods
    assert {"Generate", "GetModelInfo"} <= generator_methods
    assert generator_pb2.DESCRIPTOR.services_by_name["Generator"].methods_by_name["Generate"].server_streaming


def test_contract_fields() -> None:
    image = encoder_pb2.ImageInput(embedding_key="abc")
    assert image.WhichOneof("source") == "embedding_key"
    encoded = encoder_pb2.EncodedImage(embedding_key="k", cache_hit=True, num_tokens=3, hidden_size=4)
    assert encoded.num_tokens == 3
    sampling = generator_pb2.SamplingParams(temperature=0.0)
    # proto3 `optional`: an explicit 0 is distinguishable from unset.
    assert sampling.HasField("temperature") and not sampling.HasField("top_p")
    request = generator_pb2.GenerateRequest(
        request_id="r1",
        messages=[generator_pb2.ChatMessage(role="user", content=[generator_pb2.ContentPart(image=image)])],
        sampling=sampling,
    )
    assert request.messages[0].content[0].WhichOneof("part") == "image"
    names = generator_pb2.FinishReason.keys()
    assert names == ["FINISH_REASON_UNSPECIFIED", "FINISH_REASON_STOP", "FINISH_REASON_LENGTH", "FINISH_REASON_ABORT"]
    usage = generator_pb2.Usage(prompt_tokens=1, completion_tokens=2, cached_prompt_tokens=3, image_tokens=4)
    assert usage.image_tokens == 4
