package director

import (
	"context"
	"fmt"

	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/dynamic"
	"k8s.io/utils/ptr"
)

// The Kubernetes launcher reaches the API server through client-go's
// dynamic client, with the typed objects of k8s.io/api converted at the
// boundary, rather than through the typed clientset. The clientset links
// every API group's client and registers every group's types at start-up:
// that added 23 MiB to the resident memory of every fx process (envoys and
// `fx version` too, which never launch anything), a tenth of the memory
// goal for a 64 MiB model. The launcher needs four kinds of object.

// kubeKind is one kind of object the launcher handles: T is its k8s.io/api
// type.
type kubeKind[T any] struct {
	gvr  schema.GroupVersionResource
	kind string
}

var (
	kubeJobs     = kubeKind[batchv1.Job]{batchv1.SchemeGroupVersion.WithResource("jobs"), "Job"}
	kubePods     = kubeKind[corev1.Pod]{corev1.SchemeGroupVersion.WithResource("pods"), "Pod"}
	kubeServices = kubeKind[corev1.Service]{corev1.SchemeGroupVersion.WithResource("services"), "Service"}
	kubeSecrets  = kubeKind[corev1.Secret]{corev1.SchemeGroupVersion.WithResource("secrets"), "Secret"}
)

// in is the kind's objects in one namespace.
func (k kubeKind[T]) in(client dynamic.Interface, ns string) kubeObjects[T] {
	return kubeObjects[T]{kind: k, r: client.Resource(k.gvr).Namespace(ns)}
}

// kubeObjects are the objects of one kind in one namespace.
type kubeObjects[T any] struct {
	kind kubeKind[T]
	r    dynamic.ResourceInterface
}

// toUnstructured is obj as the dynamic client sends it, with the apiVersion
// and kind the API server decodes it by (typed objects built in code leave
// them empty).
func (o kubeObjects[T]) toUnstructured(obj *T) (*unstructured.Unstructured, error) {
	m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(obj)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", o.kind.kind, err)
	}
	u := &unstructured.Unstructured{Object: m}
	u.SetAPIVersion(o.kind.gvr.GroupVersion().String())
	u.SetKind(o.kind.kind)
	return u, nil
}

// fromUnstructured is u as a T.
func (o kubeObjects[T]) fromUnstructured(u *unstructured.Unstructured) (*T, error) {
	out := new(T)
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.UnstructuredContent(), out); err != nil {
		return nil, fmt.Errorf("%s %s from the API server: %w", o.kind.kind, u.GetName(), err)
	}
	return out, nil
}

// typed converts what a call returned, passing its error on.
func (o kubeObjects[T]) typed(u *unstructured.Unstructured, err error) (*T, error) {
	if err != nil {
		return nil, err
	}
	return o.fromUnstructured(u)
}

func (o kubeObjects[T]) Create(ctx context.Context, obj *T) (*T, error) {
	u, err := o.toUnstructured(obj)
	if err != nil {
		return nil, err
	}
	return o.typed(o.r.Create(ctx, u, metav1.CreateOptions{}))
}

func (o kubeObjects[T]) Update(ctx context.Context, obj *T) (*T, error) {
	u, err := o.toUnstructured(obj)
	if err != nil {
		return nil, err
	}
	return o.typed(o.r.Update(ctx, u, metav1.UpdateOptions{}))
}

func (o kubeObjects[T]) Get(ctx context.Context, name string) (*T, error) {
	return o.typed(o.r.Get(ctx, name, metav1.GetOptions{}))
}

// Delete deletes with background propagation: a Job deleted without it
// would orphan its pod.
func (o kubeObjects[T]) Delete(ctx context.Context, name string) error {
	return o.r.Delete(ctx, name, metav1.DeleteOptions{PropagationPolicy: ptr.To(metav1.DeletePropagationBackground)})
}

// List lists the objects the label selector matches ("": all).
func (o kubeObjects[T]) List(ctx context.Context, selector string) ([]T, error) {
	l, err := o.r.List(ctx, metav1.ListOptions{LabelSelector: selector})
	if err != nil {
		return nil, err
	}
	out := make([]T, 0, len(l.Items))
	for i := range l.Items {
		obj, err := o.fromUnstructured(&l.Items[i])
		if err != nil {
			return nil, err
		}
		out = append(out, *obj)
	}
	return out, nil
}

// Watch watches the objects the label selector matches. Its events carry
// unstructured objects: Object turns one into a T.
func (o kubeObjects[T]) Watch(ctx context.Context, selector string) (watch.Interface, error) {
	return o.r.Watch(ctx, metav1.ListOptions{LabelSelector: selector})
}

// Object is a watch event's object as a T, or nil when it is none (an
// error event's Status, another kind).
func (o kubeObjects[T]) Object(obj runtime.Object) *T {
	u, ok := obj.(*unstructured.Unstructured)
	if !ok || u.GetKind() != "" && u.GetKind() != o.kind.kind {
		return nil
	}
	out, err := o.fromUnstructured(u)
	if err != nil {
		return nil
	}
	return out
}
