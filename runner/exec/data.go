package exec

import (
	"encoding/binary"
	"encoding/json"
	"fmt"

	"github.com/fx-fl/fx/dataset"
	"github.com/fx-fl/fx/tensor"
)

// DataFileName is the file in the runner's work directory that holds the
// site's data set as the envoy loaded and cut it.
const DataFileName = "data.safetensors"

// The tensors of the data file. Samples are rows: train.x is
// [N, sample shape...] F32, train.y is [N] I64 (the label indices, in the
// integer type PyTorch's losses take), and the same for valid.
const (
	DataTrainX = "train.x"
	DataTrainY = "train.y"
	DataValidX = "valid.x"
	DataValidY = "valid.y"
)

// WriteDataFile writes a data set as safetensors, with its class count,
// sample shape, class names and description as metadata: a form any
// language reads cheaply (numpy and PyTorch map it without parsing), so a
// runner uses exactly the samples fx's own loaders picked for this site.
// It is scratch, written once per runner: not flushed to disk.
func WriteDataFile(path string, d *dataset.Dataset) error {
	if err := d.Validate(); err != nil {
		return err
	}
	shape := func(n int) []int64 { return append([]int64{int64(n)}, d.SampleShape...) }
	labels := func(name string, y []int32) *tensor.Tensor {
		t := tensor.New(name, tensor.I64, []int64{int64(len(y))})
		for i, v := range y {
			binary.LittleEndian.PutUint64(t.Data[8*i:], uint64(int64(v)))
		}
		return t
	}
	m := tensor.Model{
		tensor.ViewFloat32(DataTrainX, shape(d.Train.N), d.Train.X),
		labels(DataTrainY, d.Train.Y),
		tensor.ViewFloat32(DataValidX, shape(d.Valid.N), d.Valid.X),
		labels(DataValidY, d.Valid.Y),
	}
	sampleShape, _ := json.Marshal(d.SampleShape)
	meta := map[string]string{
		"classes":      fmt.Sprint(d.Classes),
		"sample_shape": string(sampleShape),
		"description":  d.Description,
	}
	if d.ClassNames != nil {
		names, _ := json.Marshal(d.ClassNames)
		meta["class_names"] = string(names)
	}
	return tensor.WriteScratchFile(path, m, meta)
}
